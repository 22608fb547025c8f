// dwops CUDA emulator: a host stand-in for cuda_fp16.h (only what dwops' kernels use).
// __half holds IEEE binary16 bits; conversions go through GCC's _Float16 (round to nearest even).
#pragma once
#include <cstring>

struct __half {
    unsigned short bits;
};

inline float __half2float(__half h) {
    _Float16 f;
    std::memcpy(&f, &h.bits, 2);
    return static_cast<float>(f);
}

inline __half __float2half_rn(float v) {
    const _Float16 f = static_cast<_Float16>(v);
    __half h;
    std::memcpy(&h.bits, &f, 2);
    return h;
}
