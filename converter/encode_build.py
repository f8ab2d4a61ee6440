"""cffi API-mode bindings to the converter's C encoder (converter/csrc/carvq-encode.c): emits the
C source of carvq.converter._encode_cffi. Run by CMake at build time:
python converter/encode_build.py OUT.c"""
from __future__ import annotations

import sys

import cffi

CDEF = """
int32_t carvq_rows_encode(const float * x, int64_t n_rows, int64_t x_row_stride, int64_t x_group_stride,
                          const float * codebooks, int32_t n_groups, int32_t n_levels, int32_t k, int32_t d,
                          int32_t beam, uint8_t * codes, int64_t c_row_stride, int64_t c_group_stride);
void carvq_rows_levels_sum(const uint8_t * codes, const int32_t * depth, int64_t n_rows, const float * codebooks,
                           int32_t n_groups, int32_t n_levels, int32_t k, int32_t d, int32_t skip, int32_t g0,
                           int32_t g1, float * out);
void carvq_level_refit(const float * x, uint8_t * codes, const int32_t * depth, const double * w, int64_t n_rows,
                       const float * codebooks, int32_t n_groups, int32_t n_levels, int32_t k, int32_t d,
                       int32_t level, int32_t reassign, int32_t g0, int32_t g1, double * num, double * mass);
#define CARVQ_ENCODE_MAX_BEAM ...
#define CARVQ_ENCODE_MAX_LEVELS ...
#define CARVQ_ENCODE_MAX_K ...
#define CARVQ_ENCODE_MAX_D ...
"""


def builder() -> cffi.FFI:
    ffi = cffi.FFI()
    ffi.cdef(CDEF)
    ffi.set_source("carvq.converter._encode_cffi", '#include "carvq-encode.h"\n')
    return ffi


if __name__ == "__main__":
    builder().emit_c_code(sys.argv[1])
