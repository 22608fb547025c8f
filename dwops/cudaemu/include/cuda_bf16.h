// dwops CUDA emulator: a host stand-in for cuda_bf16.h (only what dwops' kernels use).
// __nv_bfloat16 holds the upper 16 bits of a float32; float -> bfloat16 rounds to nearest even,
// NaN becomes the quiet NaN 0x7FFF as CUDA's own host conversion does.
#pragma once
#include <cstdint>
#include <cstring>

struct __nv_bfloat16 {
    unsigned short bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const std::uint32_t u = static_cast<std::uint32_t>(h.bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline __nv_bfloat16 __float2bfloat16_rn(float v) {
    std::uint32_t u;
    std::memcpy(&u, &v, 4);
    __nv_bfloat16 h;
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
        h.bits = 0x7FFF;
        return h;
    }
    u += 0x7FFFu + ((u >> 16) & 1u);
    h.bits = static_cast<unsigned short>(u >> 16);
    return h;
}
