// Shared helpers of the CPU kernels.
#pragma once
#include <cstdint>

namespace kvloom {

// exp(x) by Cody-Waite range reduction and a degree-6 polynomial, accurate to a few ulp for x in
// [-87, 88] (inputs are clamped to it), written so the compiler vectorizes the loop calling it.
inline float fast_exp(float x) {
  x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
  const float t = x * 1.44269504088896341f;
  const float fi = __builtin_floorf(t);
  const float f = x - fi * 0.693359375f + fi * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.f;
  int32_t bits = (static_cast<int32_t>(fi) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace kvloom
