/* Preloaded (LD_PRELOAD) into both sides of the bench's generation and prompt rows.
 *
 * ggml's CPU backend takes its per-graph work buffer from `new uint8_t[size]`, which glibc
 * aligns to 16 bytes only. Whether that buffer starts on a 32-byte boundary is then decided by
 * everything the process allocated before it, and llama.cpp's tiled flash-attention kernel,
 * whose per-thread scratch lives there, needs about 25% more CPU when it does not (bench/README.md
 * has the measurements). A Python process and llama-completion draw that lot differently, and
 * so do two runs of one program with other flags, so a ratio between them measured the draw.
 * This gives every large allocation 64-byte alignment, on both sides alike. */
#include <stdlib.h>

extern void *__libc_malloc(size_t size);

void *malloc(size_t size) {
    void *memory;
    if (size < 256 * 1024)
        return __libc_malloc(size);
    return posix_memalign(&memory, 64, size) == 0 ? memory : NULL;
}
