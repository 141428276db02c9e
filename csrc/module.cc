// The Python module `banded_rnn._lstm_cpu`: the XLA FFI handlers (handlers.h)
// for `jax.ffi.register_ffi_target`, and the instruction-set, thread and
// cache settings (dispatch.h, caches.h) that banded_rnn/_backends/_native.py
// reads and sets.

#include <Python.h>

#include <cstddef>
#include <utility>

#include "caches.h"
#include "dispatch.h"
#include "handlers.h"
#include "recurrence.h"

namespace {

PyObject* Capsule(void* handler) { return PyCapsule_New(handler, nullptr, nullptr); }

PyObject* Targets(PyObject*, PyObject*) {
  PyObject* targets = PyDict_New();
  if (targets == nullptr) return nullptr;
  const std::pair<const char*, void*> entries[] = {
      {"banded_rnn_lstm_forward", reinterpret_cast<void*>(BandedRnnLstmForward)},
      {"banded_rnn_lstm_forward_train", reinterpret_cast<void*>(BandedRnnLstmForwardTrain)},
      {"banded_rnn_lstm_backward", reinterpret_cast<void*>(BandedRnnLstmBackward)},
  };
  for (const auto& [name, handler] : entries) {
    PyObject* capsule = Capsule(handler);
    if (capsule == nullptr || PyDict_SetItemString(targets, name, capsule) != 0) {
      Py_XDECREF(capsule);
      Py_DECREF(targets);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return targets;
}

PyObject* Isa(PyObject*, PyObject*) { return PyUnicode_FromString(banded_rnn::CurrentIsa().name); }

PyObject* Isas(PyObject*, PyObject*) {
  const auto& isas = banded_rnn::SupportedIsas();
  PyObject* names = PyTuple_New(static_cast<Py_ssize_t>(isas.size()));
  if (names == nullptr) return nullptr;
  for (std::size_t i = 0; i < isas.size(); ++i) {
    PyTuple_SET_ITEM(names, static_cast<Py_ssize_t>(i), PyUnicode_FromString(isas[i]->name));
  }
  return names;
}

PyObject* SetIsa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) return nullptr;
  const banded_rnn::IsaBuild* isa = banded_rnn::FindIsa(name);
  if (isa == nullptr) {
    PyErr_Format(PyExc_ValueError, "isa: %s is not supported on this CPU", name);
    return nullptr;
  }
  banded_rnn::SetIsa(*isa);
  Py_RETURN_NONE;
}

PyObject* Width(PyObject*, PyObject*) { return PyLong_FromLong(banded_rnn::CurrentIsa().width); }

PyObject* RowTile(PyObject*, PyObject*) {
  return PyLong_FromLong(banded_rnn::CurrentIsa().row_tile);
}

PyObject* TileVectors(PyObject*, PyObject*) {
  return PyLong_FromLong(banded_rnn::CurrentIsa().tile_vectors);
}

PyObject* Threads(PyObject*, PyObject*) { return PyLong_FromLong(banded_rnn::ThreadSetting()); }

PyObject* SetThreads(PyObject*, PyObject* arg) {
  const long threads = PyLong_AsLong(arg);
  if (threads == -1 && PyErr_Occurred()) return nullptr;
  if (threads < 0 || threads > 4096) {
    PyErr_Format(PyExc_ValueError, "threads: expected 0 (auto) to 4096; received %ld", threads);
    return nullptr;
  }
  banded_rnn::SetThreadSetting(static_cast<int>(threads));
  Py_RETURN_NONE;
}

PyObject* LastThreads(PyObject*, PyObject*) { return PyLong_FromLong(banded_rnn::LastThreads()); }

PyObject* Calls(PyObject*, PyObject*) { return PyLong_FromLongLong(banded_rnn::Calls()); }

PyObject* SizesDict(const banded_rnn::CacheSizes& sizes) {
  return Py_BuildValue("{s:L,s:L,s:L}", "l1d", static_cast<long long>(sizes.l1d), "l2",
                       static_cast<long long>(sizes.l2), "l3", static_cast<long long>(sizes.l3));
}

PyObject* Caches(PyObject*, PyObject*) { return SizesDict(banded_rnn::PlannedCacheSizes()); }

PyObject* DetectedCaches(PyObject*, PyObject*) {
  return SizesDict(banded_rnn::DetectedCacheSizes());
}

PyObject* SetCaches(PyObject*, PyObject* args) {
  long long l1d = 0, l2 = 0, l3 = 0;
  if (!PyArg_ParseTuple(args, "LLL", &l1d, &l2, &l3)) return nullptr;
  if (l1d < 0 || l2 < 0 || l3 < 0) {
    PyErr_SetString(PyExc_ValueError, "caches: expected sizes >= 0 bytes");
    return nullptr;
  }
  banded_rnn::SetCacheSizes(banded_rnn::CacheSizes{l1d, l2, l3});
  Py_RETURN_NONE;
}

PyObject* RowBlock(PyObject*, PyObject* args) {
  long long features = 0, units = 0, rows = 0;
  if (!PyArg_ParseTuple(args, "LLL", &features, &units, &rows)) return nullptr;
  if (features < 0 || units < 1 || rows < 1) {
    PyErr_SetString(PyExc_ValueError, "row_block: expected features >= 0, units and rows >= 1");
    return nullptr;
  }
  return PyLong_FromLongLong(
      banded_rnn::ForwardRowBlock(banded_rnn::CurrentIsa(), features, units, rows));
}

PyMethodDef kMethods[] = {
    {"targets", Targets, METH_NOARGS, "{name: PyCapsule} of the XLA FFI handlers."},
    {"isa", Isa, METH_NOARGS, "The instruction set the kernel runs with."},
    {"isas", Isas, METH_NOARGS, "The instruction sets this CPU can run, fastest first."},
    {"set_isa", SetIsa, METH_O, "Runs the kernel with the named instruction set."},
    {"width", Width, METH_NOARGS, "Floats per vector of the instruction set in use."},
    {"row_tile", RowTile, METH_NOARGS, "Rows per microkernel tile of that set."},
    {"tile_vectors", TileVectors, METH_NOARGS, "Vectors per microkernel tile of that set."},
    {"threads", Threads, METH_NOARGS, "The thread setting: 0 means XLA's intra-op pool size."},
    {"set_threads", SetThreads, METH_O, "Sets the most threads one call uses (0: auto)."},
    {"last_threads", LastThreads, METH_NOARGS, "Threads the last call used."},
    {"calls", Calls, METH_NOARGS, "Forward calls of the kernel in this process."},
    {"caches", Caches, METH_NOARGS, "{l1d, l2, l3}: the cache sizes blocking plans with."},
    {"detected_caches", DetectedCaches, METH_NOARGS, "{l1d, l2, l3}: what the CPU reports."},
    {"set_caches", SetCaches, METH_VARARGS, "Plans with (l1d, l2, l3) bytes; zeros: detected."},
    {"row_block", RowBlock, METH_VARARGS,
     "Rows per L2 block of a forward over (features, units, rows), one thread's rows."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT,
    "_lstm_cpu",
    "The native CPU kernel of the LSTM recurrence.",
    -1,
    kMethods,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__lstm_cpu() { return PyModule_Create(&kModule); }
