/* llama.cpp's debug log lines, dropped before they reach Python.
 *
 * llama.cpp hands every log line to its callback, debug lines included: about 1,300 while it loads
 * Gemma 3 270M, most in one burst as it makes the tensors and the context. A ctypes callback takes
 * the GIL for each line, and while another thread runs Python (the chat imports on one while the
 * model loads, gemmachat/chat.py) each of them waits for it. Without --verbose nothing reads those
 * lines, so `CALLBACK` drops them without the GIL and hands the others on to the log callback whose
 * address llama_log_set was given as its user data.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* ggml.h's enum ggml_log_level. */
#define LEVEL_DEBUG 1
#define LEVEL_CONT 5

typedef void (*log_callback)(int level, const char *text, void *user_data);

/* A continuation line has the level of the line it continues. */
static int last_level;

static void quiet_log(int level, const char *text, void *next) {
    if (level != LEVEL_CONT) {
        last_level = level;
    }
    if (last_level != LEVEL_DEBUG && next != NULL) {
        ((log_callback)next)(level, text, NULL);
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_quiet_log", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__quiet_log(void) {
    PyObject *self = PyModule_Create(&module);
    if (self == NULL) {
        return NULL;
    }
    PyObject *address = PyLong_FromVoidPtr((void *)quiet_log);
    if (address == NULL || PyModule_AddObject(self, "CALLBACK", address) != 0) {
        Py_XDECREF(address);
        Py_DECREF(self);
        return NULL;
    }
    return self;
}
