// Compile-check shim (tools/nvcc_check.sh only): a CPU build of torch ships the c10/cuda headers
// but not this header, which a CUDA build of torch generates at configure time. Real builds
// (setup.py against a CUDA torch) never see this directory.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
