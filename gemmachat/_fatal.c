/* Two signal handlers that must be C.
 *
 * install(): one line on stderr when llama.cpp kills the process with a fatal signal (SIGILL,
 * SIGSEGV, SIGBUS, SIGFPE), then the signal's usual end: the same exit status and core dump as
 * without us. The signal arrives in the middle of llama.cpp's machine code, usually on a thread
 * that does not hold the GIL, and the process cannot go back to Python. Python's faulthandler only
 * prints "Fatal Python error" and a traceback, which tells a user nothing about what to do.
 *
 * exit_on(): ctrl-c during start-up ends the process at once. While the model loads, the main
 * thread sits in one long C call, where Python's own handler cannot run, and a KeyboardInterrupt
 * raised in llama.cpp's log callback is swallowed by ctypes: start-up would carry on regardless.
 *
 * The handlers only call write(), raise() and _exit(), which are async-signal-safe.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#ifdef _WIN32
#include <io.h>
#define write _write
#define SA_NODEFER 0 /* signal() has no flags there */
#else
#include <unistd.h>
#endif

#define MAX_SIGNAL 64
#define MAX_MESSAGE 1024

static char messages[MAX_SIGNAL][MAX_MESSAGE];
static int exit_statuses[MAX_SIGNAL];

static void write_message(int signum) {
    if (signum > 0 && signum < MAX_SIGNAL && messages[signum][0]) {
        /* Nothing can be done about a failed write to stderr in a dying process. */
        if (write(2, messages[signum], (unsigned)strlen(messages[signum])) < 0) {
        }
    }
}

static void on_fatal_signal(int signum) {
    write_message(signum);
    /* The default action again, then the signal again: the process ends as it would have. */
    signal(signum, SIG_DFL);
    raise(signum);
}

static void on_exit_signal(int signum) {
    write_message(signum);
    _exit(signum > 0 && signum < MAX_SIGNAL ? exit_statuses[signum] : 1);
}

/* Keeps the message for the signal and makes `handler` its handler. */
static int set_handler(int signum, const char *message, Py_ssize_t length, void (*handler)(int),
                       int flags) {
    if (signum <= 0 || signum >= MAX_SIGNAL || length >= MAX_MESSAGE) {
        PyErr_SetString(PyExc_ValueError, "signal number or message out of range");
        return -1;
    }
    memcpy(messages[signum], message, (size_t)length);
    messages[signum][length] = '\0';
#ifdef _WIN32
    (void)flags;
    if (signal(signum, handler) == SIG_ERR) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
#else
    struct sigaction action;
    memset(&action, 0, sizeof(action));
    action.sa_handler = handler;
    sigemptyset(&action.sa_mask);
    action.sa_flags = flags;
    if (sigaction(signum, &action, NULL) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
#endif
    return 0;
}

static PyObject *install(PyObject *self, PyObject *args) {
    int signum;
    const char *message;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "is#", &signum, &message, &length)) {
        return NULL;
    }
    /* SA_NODEFER: raise() inside the handler must not wait for the handler to return. */
    if (set_handler(signum, message, length, on_fatal_signal, SA_NODEFER) != 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *exit_on(PyObject *self, PyObject *args) {
    int signum;
    int status;
    const char *message;
    Py_ssize_t length;
    if (!PyArg_ParseTuple(args, "iis#", &signum, &status, &message, &length)) {
        return NULL;
    }
    if (signum > 0 && signum < MAX_SIGNAL) {
        exit_statuses[signum] = status;
    }
    if (set_handler(signum, message, length, on_exit_signal, 0) != 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"install", install, METH_VARARGS,
     "install(signum, message): write message to stderr when signum kills the process."},
    {"exit_on", exit_on, METH_VARARGS,
     "exit_on(signum, status, message): when signum comes, write message to stderr and exit with "
     "status at once (Python's handler for it comes back with signal.signal)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fatal", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fatal(void) { return PyModule_Create(&module); }
