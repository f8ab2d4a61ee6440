// splitmix64: the small, seedable generator of the standalone C harnesses (carvq_fuzz.c,
// screen_check.c). Each including file gets its own state.
#pragma once

#include <stdint.h>

static uint64_t rng_state;

static uint64_t rng_next(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
