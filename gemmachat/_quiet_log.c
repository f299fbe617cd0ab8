/* llama.cpp's debug log lines, dropped before they reach Python.
 *
 * llama.cpp hands every log line to its callback, debug lines included: about 1,300 while it loads
 * Gemma 3 270M, most in one burst as it makes the tensors and the context. A ctypes callback takes
 * the GIL for each line, and while another thread runs Python (the chat imports on one while the
 * model loads, gemmachat/chat.py) each of them waits for it. Without --verbose nothing reads those
 * lines, so this callback drops them without the GIL and hands the others on to Python's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* ggml.h's enum ggml_log_level. */
#define LEVEL_DEBUG 1
#define LEVEL_CONT 5

typedef void (*log_callback)(int level, const char *text, void *user_data);

static log_callback python_callback;
/* A continuation line has the level of the line it continues. */
static int last_level;

static void quiet_log(int level, const char *text, void *user_data) {
    if (level != LEVEL_CONT) {
        last_level = level;
    }
    if (last_level != LEVEL_DEBUG && python_callback != NULL) {
        python_callback(level, text, user_data);
    }
}

static PyObject *wrap(PyObject *self, PyObject *args) {
    unsigned long long address;
    if (!PyArg_ParseTuple(args, "K", &address)) {
        return NULL;
    }
    python_callback = (log_callback)(uintptr_t)address;
    return PyLong_FromVoidPtr((void *)quiet_log);
}

static PyMethodDef methods[] = {
    {"wrap", wrap, METH_VARARGS,
     "wrap(address): the address of a log callback for llama_log_set that drops debug lines and "
     "passes the others to the callback at `address` (a ctypes function kept alive by the caller)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quiet_log", NULL, -1, methods};

PyMODINIT_FUNC PyInit__quiet_log(void) { return PyModule_Create(&module); }
