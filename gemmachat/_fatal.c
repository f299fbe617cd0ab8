/* One line on stderr when llama.cpp kills the process with a fatal signal (SIGILL, SIGSEGV,
 * SIGBUS, SIGFPE), then the signal's usual end: the same exit status and core dump as without us.
 *
 * This has to be C: the signal arrives in the middle of llama.cpp's machine code, usually on a
 * thread that does not hold the GIL, and the process cannot go back to Python. Python's
 * faulthandler only prints "Fatal Python error" and a traceback, which tells a user nothing about
 * what to do. The handler only calls write() and raise(), which are async-signal-safe.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <signal.h>
#include <string.h>
#ifdef _WIN32
#include <io.h>
#define write _write
#else
#include <unistd.h>
#endif

#define MAX_SIGNAL 64
#define MAX_MESSAGE 1024

static char messages[MAX_SIGNAL][MAX_MESSAGE];

static void on_fatal_signal(int signum) {
    if (signum > 0 && signum < MAX_SIGNAL && messages[signum][0]) {
        /* Nothing can be done about a failed write to stderr in a dying process. */
        if (write(2, messages[signum], (unsigned)strlen(messages[signum])) < 0) {
        }
    }
    /* The default action again, then the signal again: the process ends as it would have. */
    signal(signum, SIG_DFL);
    raise(signum);
}

static PyObject *install(PyObject *self, PyObject *args) {
    int signum;
    const char *message;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "is#", &signum, &message, &length)) {
        return NULL;
    }
    if (signum <= 0 || signum >= MAX_SIGNAL || length >= MAX_MESSAGE) {
        PyErr_SetString(PyExc_ValueError, "signal number or message out of range");
        return NULL;
    }
    memcpy(messages[signum], message, (size_t)length);
    messages[signum][length] = '\0';
#ifdef _WIN32
    if (signal(signum, on_fatal_signal) == SIG_ERR) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
#else
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = on_fatal_signal;
    sigemptyset(&action.sa_mask);
    /* SA_NODEFER: raise() inside the handler must not wait for the handler to return. */
    action.sa_flags = SA_NODEFER;
    if (sigaction(signum, &action, NULL) != 0) {
        return PyErr_SetFromErrno(PyExc_OSError);
    }
#endif
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS,
     "install(signum, message): write message to stderr when signum kills the process."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fatal", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fatal(void) { return PyModule_Create(&module); }
