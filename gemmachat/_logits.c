/* Work over the whole vocabulary's logits, which Python cannot afford per token: Gemma has
 * 262,144 of them, and a Python loop over them costs about 40 ms, more than the decode of a small
 * model. Both functions run without the GIL, beside the decode.
 *
 * top(): log-probabilities of a sampled token and the most likely others (the server's logprobs).
 * candidates(): llama.cpp's candidate array filled from the logits, as common_sampler's
 * set_logits does, so that a grammar can be checked on the sampled token alone (engine.py).
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

/* llama.h's llama_token_data. */
typedef struct {
    int32_t id;
    float logit;
    float p;
} token_data;

/* candidates(logits_address, n_vocab, data_address): data[i] = {i, logits[i], 0} for every token. */
static PyObject *candidates(PyObject *self, PyObject *args) {
    unsigned long long logits_address, data_address;
    int n_vocab;
    if (!PyArg_ParseTuple(args, "KiK", &logits_address, &n_vocab, &data_address)) {
        return NULL;
    }
    if (logits_address == 0 || data_address == 0 || n_vocab <= 0) {
        PyErr_SetString(PyExc_ValueError, "no logits or no array");
        return NULL;
    }
    const float *logits = (const float *)(uintptr_t)logits_address;
    token_data *data = (token_data *)(uintptr_t)data_address;
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < n_vocab; i++) {
        data[i].id = i;
        data[i].logit = logits[i];
        data[i].p = 0.0f;
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"top", top, METH_VARARGS, "top(address, n_vocab, token, k) -> (logprob, [(id, logprob), ...])"},
    {"candidates", candidates, METH_VARARGS, "candidates(logits_address, n_vocab, data_address)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_logits", NULL, -1, methods};

PyMODINIT_FUNC PyInit__logits(void) { return PyModule_Create(&module); }
