/* NaN/Inf checks of floating-point bytes, fused with the copy that moves them.
 *
 * A float is non-finite exactly when all its exponent bits are set, so one
 * AND and one compare per value decide it; compilers vectorize the loops
 * below (AVX2 where the CPU has it, through target clones). Fused into a
 * copy the check rides on values already in registers, and the copy, which
 * is bound by memory bandwidth, takes no longer for it
 * (bench/seal.py: "copy + check").
 *
 * Python API (module hpresil.checkpoint._finite; wrapped by
 * hpresil.checkpoint.finite):
 *   copy_check(dst: int, src: int, nbytes: int, width: int, mask: int) -> bool
 *       copies nbytes from address src to address dst (not overlapping) and
 *       says whether a value of `width` bytes (2, 4 or 8) whose exponent bits
 *       are `mask` is non-finite.
 *   check(buffer, width: int, mask: int) -> bool
 *       the same verdict for a contiguous buffer, without a copy.
 * Both release the GIL for large inputs. Trailing bytes that do not form a
 * whole value are copied and not judged.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

/* Values per block: a block is judged as a whole, and once a non-finite
 * value was found the rest is copied without looking. */
#define BLOCK_BYTES (64 * 1024)
/* Below this, releasing the GIL costs more than the work. */
#define NOGIL_BYTES (256 * 1024)

#define KERNELS(T, NAME)                                                          \
    CLONES static int copy_block_##NAME(char *dst, const char *src, size_t n, T m) \
    {                                                                             \
        T acc = 0;                                                                \
        for (size_t i = 0; i < n; i++) {                                          \
            T x;                                                                  \
            memcpy(&x, src + i * sizeof(T), sizeof(T));                           \
            memcpy(dst + i * sizeof(T), &x, sizeof(T));                           \
            acc |= (T)((x & m) == m);                                             \
        }                                                                         \
        return acc != 0;                                                          \
    }                                                                             \
    CLONES static int check_block_##NAME(const char *src, size_t n, T m)          \
    {                                                                             \
        T acc = 0;                                                                \
        for (size_t i = 0; i < n; i++) {                                          \
            T x;                                                                  \
            memcpy(&x, src + i * sizeof(T), sizeof(T));                           \
            acc |= (T)((x & m) == m);                                             \
        }                                                                         \
        return acc != 0;                                                          \
    }

KERNELS(uint16_t, 16)
KERNELS(uint32_t, 32)
KERNELS(uint64_t, 64)

/* Copies (dst != NULL) and/or judges n bytes; returns 1 when a value is non-finite. */
static int run(char *dst, const char *src, size_t n, int width, uint64_t mask)
{
    size_t whole = n - n % (size_t)width;
    int found = 0;
    size_t at = 0;
    while (at < whole && !found) {
        size_t len = whole - at < BLOCK_BYTES ? whole - at : BLOCK_BYTES;
        size_t count = len / (size_t)width;
        if (dst) {
            switch (width) {
            case 2: found = copy_block_16(dst + at, src + at, count, (uint16_t)mask); break;
            case 4: found = copy_block_32(dst + at, src + at, count, (uint32_t)mask); break;
            default: found = copy_block_64(dst + at, src + at, count, mask); break;
            }
        } else {
            switch (width) {
            case 2: found = check_block_16(src + at, count, (uint16_t)mask); break;
            case 4: found = check_block_32(src + at, count, (uint32_t)mask); break;
            default: found = check_block_64(src + at, count, mask); break;
            }
        }
        at += len;
    }
    if (dst && at < n)
        memcpy(dst + at, src + at, n - at);
    return found;
}

static int valid(int width, unsigned long long mask)
{
    if (width != 2 && width != 4 && width != 8) {
        PyErr_Format(PyExc_ValueError, "width=%d: must be 2, 4 or 8 bytes", width);
        return 0;
    }
    if (mask == 0 || (width < 8 && mask >> (8 * width))) {
        PyErr_Format(PyExc_ValueError, "mask=%#llx: must be a non-zero exponent mask of a %d-byte value", mask, width);
        return 0;
    }
    return 1;
}

static PyObject *py_copy_check(PyObject *self, PyObject *args)
{
    unsigned long long dst, src, mask;
    Py_ssize_t nbytes;
    int width, found;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKniK", &dst, &src, &nbytes, &width, &mask))
        return NULL;
    if (!valid(width, mask))
        return NULL;
    if (nbytes < 0 || (nbytes && (!dst || !src))) {
        PyErr_SetString(PyExc_ValueError, "copy_check: a negative size or a null address");
        return NULL;
    }
    if (nbytes >= NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        found = run((char *)(uintptr_t)dst, (const char *)(uintptr_t)src, (size_t)nbytes, width, mask);
        Py_END_ALLOW_THREADS
    } else {
        found = run((char *)(uintptr_t)dst, (const char *)(uintptr_t)src, (size_t)nbytes, width, mask);
    }
    return PyBool_FromLong(found);
}

static PyObject *py_check(PyObject *self, PyObject *args)
{
    Py_buffer view;
    unsigned long long mask;
    int width, found;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*iK", &view, &width, &mask))
        return NULL;
    if (!valid(width, mask)) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (view.len >= NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        found = run(NULL, (const char *)view.buf, (size_t)view.len, width, mask);
        Py_END_ALLOW_THREADS
    } else {
        found = run(NULL, (const char *)view.buf, (size_t)view.len, width, mask);
    }
    PyBuffer_Release(&view);
    return PyBool_FromLong(found);
}

static PyMethodDef methods[] = {
    {"copy_check", py_copy_check, METH_VARARGS,
     "copy_check(dst, src, nbytes, width, mask) -> bool: copy and say whether a value is NaN/Inf."},
    {"check", py_check, METH_VARARGS, "check(buffer, width, mask) -> bool: whether a value is NaN/Inf."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_finite", "NaN/Inf checks fused with copies (see finite.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__finite(void)
{
    return PyModule_Create(&module);
}
