// Host check of the CUDA kernels' fast float8 decode (csrc/common/cuda_kv.cuh: byte -> fp16 bits,
// times kv_decode_mul) against common/fp8.h's decode over all 256 codes of both formats, and of
// common/fp8.h's encode round trip (encode(decode(c)) == c for every finite code). No GPU needed:
//   nvcc -std=c++17 -Icsrc tools/check_fp8_decode.cu -o /tmp/check_fp8 && /tmp/check_fp8
#include <cmath>
#include <cstdio>

#include "common/cuda_kv.cuh"

using namespace kvmem;

template <int F>
static int check(const char* name, float mul) {
  int bad = 0;
  for (uint32_t w0 = 0; w0 < 256; w0 += 4) {
    const uint32_t w = w0 | (w0 + 1) << 8 | (w0 + 2) << 16 | (w0 + 3) << 24;
    uint32_t lo, hi;
    fp8x4_to_half2_bits<F>(w, lo, hi);
    const uint16_t halves[4] = {uint16_t(lo & 0xffff), uint16_t(lo >> 16), uint16_t(hi & 0xffff), uint16_t(hi >> 16)};
    for (int e = 0; e < 4; ++e) {
      const uint8_t code = uint8_t(w0 + e);
      __half_raw raw;
      raw.x = halves[e];
      float got = __half2float(__half(raw));
      if (F == fp8::kE4M3) got = kv_fp8_nan_fix(got);
      const float want = fp8::decode<F>(code) * mul;
      const bool same = std::isnan(want) ? std::isnan(got) : (got == want && std::signbit(got) == std::signbit(want));
      if (!same) {
        std::printf("%s code 0x%02x: fast %.9g, fp8.h %.9g\n", name, code, got, want);
        ++bad;
      }
      if (std::isfinite(want) && fp8::encode<F>(fp8::decode<F>(code)) != code) {  // +-inf -> +-max
        std::printf("%s code 0x%02x: encode(decode) = 0x%02x\n", name, code, fp8::encode<F>(fp8::decode<F>(code)));
        ++bad;
      }
    }
  }
  std::printf("%s: %d of 256 codes differ\n", name, bad);
  return bad;
}

int main() {
  const int bad = check<fp8::kE4M3>("e4m3fn", kv_decode_mul<fp8_e4m3>()) +
                  check<fp8::kE5M2>("e5m2", kv_decode_mul<fp8_e5m2>());
  return bad == 0 ? 0 : 1;
}
