/* The admission dynamic program's kernel; the model is described in planner/admission.py.

   Requests come in deadline order. A state is (c admitted so far, t the tightest TPOT tier
   decoding, m memory units held, whether a new period started at the current deadline); its
   value is the slack: prefill capacity up to the current deadline less the prefill cost of what
   was admitted. More slack is never worse, so the most slack per state is all the future needs,
   and the plan that admits the most requests is found exactly. A period that starts at a
   deadline may lose a batch (it starts at the last batch boundary before it); that batch is
   charged once the deadline is passed, since requests due at the same deadline are checked
   against the capacity before it. Arrays come from numpy through the buffer protocol. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ARGS 12

typedef struct {
    int n, C, T, M, t0, first_below;
    const double *whole, *span, *cost, *rate, *budget, *period;
    const int32_t *tier, *units;
    const uint8_t *forced, *tied;
    size_t per_layer, per_c;
} Problem;

/* Whether (c, t) is still in the first period, which is counted in whole batches. */
static inline int in_first(const Problem *p, int c, int t) { return c < p->first_below && t == p->t0; }

/* Whether moving from (c, t) to (c2, t2) starts a new period. */
static inline int starts_period(const Problem *p, int c, int t, int c2, int t2) {
    if (in_first(p, c, t))
        return !in_first(p, c2, t2);
    return p->period[c2 * p->T + t2] != p->period[c * p->T + t];
}

/* The slack gained over request i's interval by a state (c, t). */
static inline double accrue(const Problem *p, double slack, int i, int c, int t) {
    const int ct = c * p->T + t, first = in_first(p, c, t);
    const double size = first ? p->whole[i] : p->span[i], per = first ? p->budget[ct] : p->rate[ct];
    if (isinf(size))
        return per > 0 ? INFINITY : slack;
    return slack + size * per;
}

/* accrue() over the memory row of (c, t); a dead state (-inf) stays dead, as a finite gain
   leaves it, so the common case is one add per state, which the compiler vectorises. */
static inline void accrue_row(const Problem *p, double *row, int reach, int i, int c, int t) {
    const double gain = accrue(p, 0.0, i, c, t);
    if (isinf(gain)) {
        for (int m = 0; m <= reach; m++)
            if (row[m] > -INFINITY)
                row[m] = INFINITY;
        return;
    }
    for (int m = 0; m <= reach; m++)
        row[m] += gain;
}

static inline size_t at(const Problem *p, int layer, int c, int t, int m) {
    return (size_t)layer * p->per_layer + (size_t)c * p->per_c + (size_t)t * (p->M + 1) + (size_t)m;
}

/* Charge the batch a new period may lose to every state that started one: layer 1 into layer 0.
   marks[s] = 1 where the state in layer 0 came from layer 1. */
static void settle(const Problem *p, double *val, uint8_t *marks, int top, int reach) {
    for (int c = 0; c <= top; c++)
        for (int t = 0; t < p->T; t++)
            for (int m = 0; m <= reach; m++) {
                const size_t s0 = at(p, 0, c, t, m), s1 = at(p, 1, c, t, m);
                if (val[s1] == -INFINITY)
                    continue;
                const double v = val[s1] - p->budget[c * p->T + t];
                if (v > val[s0]) {
                    val[s0] = v;
                    marks[s0] = 1;
                }
                val[s1] = -INFINITY;
            }
}

/* Fills out[] with the best plan and returns its count, -1 if none keeps every forced request.
   choice[i] per state: 0 skipped i; else 1 + tier + T * layer of the state it came from. */
static int run(const Problem *p, double *val, uint8_t *choice, uint8_t *merged, uint8_t *out) {
    const size_t states = 2 * p->per_layer;
    for (size_t s = 0; s < states; s++)
        val[s] = -INFINITY;
    val[at(p, 0, 0, p->t0, 0)] = 0.0;
    int top = 0, reach = 0; /* the largest count and memory any live state has */
    int layers = 1;         /* 2 while some state started a period at the current deadline */
    for (int i = 0; i < p->n; i++) {
        if (!p->tied[i] && layers == 2) {
            settle(p, val, merged + (size_t)i * p->per_layer, top, reach);
            layers = 1;
        }
        for (int layer = 0; layer < layers; layer++)
            for (int c = 0; c <= top; c++)
                for (int t = 0; t < p->T; t++)
                    accrue_row(p, val + at(p, layer, c, t, 0), reach, i, c, t);
        const int u = p->units[i], ti = p->tier[i];
        const double cost = p->cost[i];
        uint8_t *pick = choice + (size_t)i * states;
        int grown = 0; /* some state moved into layer 1 */
        for (int c = top; c >= 0; c--) { /* count down: row c + 1 has been read before it is written */
            if (p->forced[i] && c < p->C) /* a promise: only the states that take it go on */
                for (int layer = 0; layer < 2; layer++)
                    for (size_t s = 0; s < p->per_c; s++)
                        val[(size_t)layer * p->per_layer + (size_t)(c + 1) * p->per_c + s] = -INFINITY;
            for (int layer = 0; layer < layers && c < p->C; layer++)
                for (int t = 0; t < p->T; t++) {
                    const int t2 = ti < t ? ti : t;
                    if (p->rate[(c + 1) * p->T + t2] < 0)
                        continue; /* the decoders would miss their TPOT */
                    const int to_layer = layer | starts_period(p, c, t, c + 1, t2);
                    if (to_layer)
                        grown = 1;
                    const int last = reach < p->M - u ? reach : p->M - u; /* memory m + u must fit */
                    if (last < 0)
                        continue;
                    const double *from = val + at(p, layer, c, t, 0);
                    double *to = val + at(p, to_layer, c + 1, t2, u);
                    uint8_t *picked = pick + at(p, to_layer, c + 1, t2, u);
                    const uint8_t code = (uint8_t)(1 + t + p->T * layer);
                    for (int m = 0; m <= last; m++) { /* branch-free, so that it vectorises */
                        const double s = from[m] - cost;
                        const int better = (s >= 0) & (s > to[m]); /* not late, and a state that exists */
                        to[m] = better ? s : to[m];
                        picked[m] = better ? code : picked[m];
                    }
                }
        }
        if (p->forced[i])
            for (int layer = 0; layer < 2; layer++)
                for (size_t s = 0; s < p->per_c; s++)
                    val[(size_t)layer * p->per_layer + s] = -INFINITY;
        if (grown)
            layers = 2;
        if (top < p->C)
            top += 1;
        reach = reach + u < p->M ? reach + u : p->M;
    }
    if (layers == 2)
        settle(p, val, merged + (size_t)p->n * p->per_layer, top, reach);
    int best_c = -1, best_t = 0, best_m = 0; /* the most requests; among equals, the most slack */
    double best_v = -INFINITY;
    for (int c = p->C; c >= 0 && best_c < 0; c--)
        for (int t = 0; t < p->T; t++)
            for (int m = 0; m <= p->M; m++) {
                const double v = val[at(p, 0, c, t, m)];
                if (v > -INFINITY && (best_c < 0 || v > best_v))
                    best_c = c, best_t = t, best_m = m, best_v = v;
            }
    memset(out, 0, (size_t)p->n);
    if (best_c < 0)
        return -1;
    int c = best_c, t = best_t, m = best_m, layer = merged[(size_t)p->n * p->per_layer + at(p, 0, c, t, m)];
    for (int i = p->n - 1; i >= 0; i--) {
        const uint8_t from = choice[(size_t)i * states + at(p, layer, c, t, m)];
        if (from) {
            out[i] = 1;
            c -= 1, m -= p->units[i], t = (from - 1) % p->T, layer = (from - 1) / p->T;
        }
        if (!p->tied[i] && layer == 0 && merged[(size_t)i * p->per_layer + at(p, 0, c, t, m)])
            layer = 1;
    }
    return best_c;
}

/* The chosen plan once more, forward: the slack left at each admitted request's deadline. */
static void trace(const Problem *p, const uint8_t *out, double *slack) {
    double s = 0.0;
    int c = 0, t = p->t0, pending = 0;
    for (int i = 0; i < p->n; i++) {
        if (!p->tied[i] && pending)
            s -= p->budget[c * p->T + t], pending = 0;
        s = accrue(p, s, i, c, t);
        slack[i] = NAN;
        if (!out[i])
            continue;
        s -= p->cost[i];
        slack[i] = s;
        const int t2 = p->tier[i] < t ? p->tier[i] : t;
        pending |= starts_period(p, c, t, c + 1, t2);
        c += 1, t = t2;
    }
}

typedef struct {
    Py_buffer b;
    int held;
} Buf;

static PyObject *solve(PyObject *self, PyObject *args) {
    (void)self;
    Problem p;
    PyObject *objs[ARGS];
    if (!PyArg_ParseTuple(args, "iiiiiiOOOOOOOOOOOO", &p.n, &p.C, &p.T, &p.M, &p.t0, &p.first_below, &objs[0],
                          &objs[1], &objs[2], &objs[3], &objs[4], &objs[5], &objs[6], &objs[7], &objs[8], &objs[9],
                          &objs[10], &objs[11]))
        return NULL;
    if (p.n < 0 || p.C < 0 || p.T < 1 || p.T > 64 || p.M < 0 || p.t0 < 0 || p.t0 >= p.T) {
        PyErr_SetString(PyExc_ValueError, "bad sizes");
        return NULL;
    }
    const Py_ssize_t n = p.n, table = (Py_ssize_t)(p.C + 1) * p.T;
    const Py_ssize_t sizes[ARGS] = {8, 8, 8, 4, 4, 1, 1, 8, 8, 8, 1, 8};
    const Py_ssize_t counts[ARGS] = {n, n, n, n, n, n, n, table, table, table, n, n};
    const char *names[ARGS] = {"whole", "span", "cost",   "tier",   "units", "forced",
                               "tied",  "rate", "budget", "period", "out",   "slack"};
    Buf bufs[ARGS];
    memset(bufs, 0, sizeof(bufs));
    PyObject *result = NULL;
    double *val = NULL;
    uint8_t *choice = NULL, *merged = NULL;
    for (int k = 0; k < ARGS; k++) {
        const int writable = k >= ARGS - 2;
        if (PyObject_GetBuffer(objs[k], &bufs[k].b, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
            goto done;
        bufs[k].held = 1;
        if (bufs[k].b.len != sizes[k] * counts[k]) {
            PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", names[k], sizes[k] * counts[k],
                         bufs[k].b.len);
            goto done;
        }
    }
    p.whole = bufs[0].b.buf, p.span = bufs[1].b.buf, p.cost = bufs[2].b.buf;
    p.tier = bufs[3].b.buf, p.units = bufs[4].b.buf, p.forced = bufs[5].b.buf, p.tied = bufs[6].b.buf;
    p.rate = bufs[7].b.buf, p.budget = bufs[8].b.buf, p.period = bufs[9].b.buf;
    for (int i = 0; i < p.n; i++)
        if (p.tier[i] < 0 || p.tier[i] >= p.T || p.units[i] < 0) {
            PyErr_SetString(PyExc_ValueError, "tier or units out of range");
            goto done;
        }
    p.per_c = (size_t)p.T * (p.M + 1);
    p.per_layer = (size_t)(p.C + 1) * p.per_c;
    val = malloc(2 * p.per_layer * sizeof(double));
    choice = calloc((size_t)p.n * 2 * p.per_layer, 1);
    merged = calloc((size_t)(p.n + 1) * p.per_layer, 1);
    if (!val || !choice || !merged) {
        PyErr_NoMemory();
        goto done;
    }
    int best;
    Py_BEGIN_ALLOW_THREADS
    best = run(&p, val, choice, merged, bufs[10].b.buf);
    trace(&p, bufs[10].b.buf, bufs[11].b.buf);
    Py_END_ALLOW_THREADS
    result = PyLong_FromLong(best);
done:
    free(val);
    free(choice);
    free(merged);
    for (int k = 0; k < ARGS; k++)
        if (bufs[k].held)
            PyBuffer_Release(&bufs[k].b);
    return result;
}

static PyMethodDef methods[] = {
    {"solve", solve, METH_VARARGS,
     "solve(n, C, T, M, t0, first_below, whole, span, cost, tier, units, forced, tied, rate, budget, period, out, "
     "slack) -> the most requests admitted (-1: no plan keeps every forced one); out[i] = 1 for each admitted "
     "and slack[i] its slack at its deadline."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_dp", "The admission dynamic program's kernel.", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__dp(void) { return PyModule_Create(&module); }
