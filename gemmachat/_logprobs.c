/* Log-probabilities of a sampled token and the most likely others, from llama.cpp's logits.
 *
 * The server's `logprobs` need a log-softmax over the whole vocabulary for every token it
 * generates: Gemma's 262,144 logits. In Python that is about 40 ms a token, more than the decode
 * of a small model; here it is well under one, and it runs without the GIL, beside the decode.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

#define MAX_TOP 20

/* top(address, n_vocab, token, k) -> (logprob of token, [(id, logprob), ...k most likely])
 * `address` is llama_get_logits_ith's float pointer, valid until the context's next decode. */
static PyObject *top(PyObject *self, PyObject *args) {
    unsigned long long address;
    int n_vocab, token, k;
    if (!PyArg_ParseTuple(args, "Kiii", &address, &n_vocab, &token, &k)) {
        return NULL;
    }
    if (address == 0 || n_vocab <= 0 || token < 0 || token >= n_vocab || k < 0 || k > MAX_TOP) {
        PyErr_SetString(PyExc_ValueError, "no logits, a token outside the vocabulary, or k outside 0..20");
        return NULL;
    }
    const float *logits = (const float *)(uintptr_t)address;
    int ids[MAX_TOP];
    float best[MAX_TOP];
    int found = 0;
    double log_sum;
    Py_BEGIN_ALLOW_THREADS
    float max = logits[0];
    for (int i = 1; i < n_vocab; i++) {
        if (logits[i] > max) {
            max = logits[i];
        }
    }
    double sum = 0.0;
    for (int i = 0; i < n_vocab; i++) {
        float value = logits[i];
        sum += exp((double)value - max);
        /* Insertion into the k best so far; ties keep the lower id first, as a stable sort would. */
        if (k > 0 && (found < k || value > best[found - 1])) {
            int at = found < k ? found++ : k - 1;
            while (at > 0 && best[at - 1] < value) {
                best[at] = best[at - 1];
                ids[at] = ids[at - 1];
                at--;
            }
            best[at] = value;
            ids[at] = i;
        }
    }
    log_sum = max + log(sum);
    Py_END_ALLOW_THREADS
    PyObject *list = PyList_New(found);
    if (list == NULL) {
        return NULL;
    }
    for (int i = 0; i < found; i++) {
        PyObject *pair = Py_BuildValue("(id)", ids[i], best[i] - log_sum);
        if (pair == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, pair);
    }
    return Py_BuildValue("(dN)", logits[token] - log_sum, list);
}

static PyMethodDef methods[] = {
    {"top", top, METH_VARARGS, "top(address, n_vocab, token, k) -> (logprob, [(id, logprob), ...])"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_logprobs", NULL, -1, methods};

PyMODINIT_FUNC PyInit__logprobs(void) { return PyModule_Create(&module); }
