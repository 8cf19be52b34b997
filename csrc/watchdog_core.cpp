// Native deadline monitor of vllm-elastic-ft's rank watchdog.
//
// Role in the failure path: every MoE dispatch / combine arms a deadline on a
// slot before the call and disarms it after. Arming and disarming are two
// atomic stores (no lock, no syscall), so the hot path costs well under a
// microsecond. One monitor thread polls the armed slots; only when a deadline
// has passed does it take the GIL and call the Python callback, once per armed
// call. The callback must not block: the Python side only enqueues the miss.
//
// Python interface (module vllm_elastic_ft._watchdog_core), mirrored by the
// pure-Python fallback in vllm_elastic_ft/watchdog/deadline_monitor.py:
//   Monitor(num_slots: int, poll_interval_s: float, on_miss: callable)
//     arm(slot: int, timeout_s: float, seq: int) -> None
//     disarm(slot: int) -> None
//     stop() -> None                  # joins the thread; idempotent
//     misses -> int                   # deadlines missed so far
//   on_miss(slot: int, seq: int, overdue_s: float) is called on the monitor thread.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing();
#else
  return _Py_IsFinalizing();
#endif
}

struct Slot {
  std::atomic<int64_t> deadline_ns{0};  // 0: disarmed
  std::atomic<int64_t> seq{0};
  int64_t fired_seq = -1;  // touched by the monitor thread only
};

struct Core {
  std::vector<Slot> slots;
  std::chrono::nanoseconds poll;
  PyObject* on_miss;  // strong reference, released in stop()
  std::atomic<bool> running{true};
  std::atomic<int64_t> misses{0};
  std::thread thread;

  Core(size_t n, double poll_s, PyObject* cb)
      : slots(n), poll(static_cast<int64_t>(poll_s * 1e9)), on_miss(cb) {
    Py_INCREF(on_miss);
    thread = std::thread([this] { loop(); });
  }

  void loop() {
    while (running.load(std::memory_order_acquire)) {
      std::this_thread::sleep_for(poll);
      const int64_t now = now_ns();
      for (size_t i = 0; i < slots.size(); ++i) {
        Slot& s = slots[i];
        const int64_t deadline = s.deadline_ns.load(std::memory_order_acquire);
        if (deadline == 0 || now < deadline) continue;
        const int64_t seq = s.seq.load(std::memory_order_acquire);
        // Re-armed for another call between the two loads: not a miss.
        if (s.deadline_ns.load(std::memory_order_acquire) != deadline) continue;
        if (s.fired_seq == seq) continue;  // one callback per armed call
        s.fired_seq = seq;
        misses.fetch_add(1, std::memory_order_relaxed);
        fire(static_cast<int>(i), seq, (now - deadline) / 1e9);
      }
    }
  }

  void fire(int slot, int64_t seq, double overdue_s) {
    if (!running.load(std::memory_order_acquire) || interpreter_finalizing()) return;
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject* result = PyObject_CallFunction(on_miss, "iLd", slot, (long long)seq, overdue_s);
    if (result == nullptr) {
      PyErr_WriteUnraisable(on_miss);  // never let an exception kill the thread
    }
    Py_XDECREF(result);
    PyGILState_Release(gil);
  }

  // Called with the GIL held; releases it while joining (the thread may be
  // waiting for the GIL inside fire()).
  void stop() {
    if (!running.exchange(false)) return;
    if (thread.joinable()) {
      Py_BEGIN_ALLOW_THREADS thread.join();
      Py_END_ALLOW_THREADS
    }
    Py_CLEAR(on_miss);
  }
};

struct MonitorObject {
  PyObject_HEAD Core* core;
};

int Monitor_init(MonitorObject* self, PyObject* args, PyObject* kwargs) {
  static const char* kwlist[] = {"num_slots", "poll_interval_s", "on_miss", nullptr};
  Py_ssize_t num_slots;
  double poll_s;
  PyObject* cb;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ndO", const_cast<char**>(kwlist),
                                   &num_slots, &poll_s, &cb))
    return -1;
  if (num_slots < 1 || num_slots > 4096) {
    PyErr_SetString(PyExc_ValueError, "num_slots must be in [1, 4096]");
    return -1;
  }
  if (!(poll_s > 0.0 && poll_s <= 1.0)) {
    PyErr_SetString(PyExc_ValueError, "poll_interval_s must be in (0, 1]");
    return -1;
  }
  if (!PyCallable_Check(cb)) {
    PyErr_SetString(PyExc_TypeError, "on_miss must be callable");
    return -1;
  }
  if (self->core != nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "Monitor already initialised");
    return -1;
  }
  self->core = new Core(static_cast<size_t>(num_slots), poll_s, cb);
  return 0;
}

void Monitor_dealloc(MonitorObject* self) {
  if (self->core != nullptr) {
    self->core->stop();
    delete self->core;
    self->core = nullptr;
  }
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

Slot* slot_or_raise(MonitorObject* self, Py_ssize_t slot) {
  if (self->core == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "Monitor not initialised");
    return nullptr;
  }
  if (slot < 0 || static_cast<size_t>(slot) >= self->core->slots.size()) {
    PyErr_SetString(PyExc_IndexError, "slot out of range");
    return nullptr;
  }
  return &self->core->slots[static_cast<size_t>(slot)];
}

PyObject* Monitor_arm(MonitorObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3) {
    PyErr_SetString(PyExc_TypeError, "arm(slot, timeout_s, seq)");
    return nullptr;
  }
  Py_ssize_t slot = PyLong_AsSsize_t(args[0]);
  double timeout_s = PyFloat_AsDouble(args[1]);
  long long seq = PyLong_AsLongLong(args[2]);
  if (PyErr_Occurred()) return nullptr;
  Slot* s = slot_or_raise(self, slot);
  if (s == nullptr) return nullptr;
  s->seq.store(seq, std::memory_order_release);
  s->deadline_ns.store(now_ns() + static_cast<int64_t>(timeout_s * 1e9),
                       std::memory_order_release);
  Py_RETURN_NONE;
}

PyObject* Monitor_disarm(MonitorObject* self, PyObject* arg) {
  Py_ssize_t slot = PyLong_AsSsize_t(arg);
  if (PyErr_Occurred()) return nullptr;
  Slot* s = slot_or_raise(self, slot);
  if (s == nullptr) return nullptr;
  s->deadline_ns.store(0, std::memory_order_release);
  Py_RETURN_NONE;
}

PyObject* Monitor_stop(MonitorObject* self, PyObject*) {
  if (self->core != nullptr) self->core->stop();
  Py_RETURN_NONE;
}

PyObject* Monitor_misses(MonitorObject* self, void*) {
  return PyLong_FromLongLong(self->core ? self->core->misses.load() : 0);
}

PyMethodDef Monitor_methods[] = {
    {"arm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(Monitor_arm)),
     METH_FASTCALL, "arm(slot, timeout_s, seq): start a deadline for one call."},
    {"disarm", reinterpret_cast<PyCFunction>(Monitor_disarm), METH_O,
     "disarm(slot): the call finished."},
    {"stop", reinterpret_cast<PyCFunction>(Monitor_stop), METH_NOARGS,
     "stop(): join the monitor thread (idempotent)."},
    {nullptr, nullptr, 0, nullptr}};

PyGetSetDef Monitor_getset[] = {
    {"misses", reinterpret_cast<getter>(Monitor_misses), nullptr,
     "deadlines missed so far", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyTypeObject MonitorType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_watchdog_core",
                          "Native deadline monitor of the vllm-elastic-ft rank watchdog.",
                          -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__watchdog_core(void) {
  MonitorType.tp_name = "vllm_elastic_ft._watchdog_core.Monitor";
  MonitorType.tp_basicsize = sizeof(MonitorObject);
  MonitorType.tp_flags = Py_TPFLAGS_DEFAULT;
  MonitorType.tp_doc = "Deadline slots polled by one native thread.";
  MonitorType.tp_new = PyType_GenericNew;
  MonitorType.tp_init = reinterpret_cast<initproc>(Monitor_init);
  MonitorType.tp_dealloc = reinterpret_cast<destructor>(Monitor_dealloc);
  MonitorType.tp_methods = Monitor_methods;
  MonitorType.tp_getset = Monitor_getset;
  if (PyType_Ready(&MonitorType) < 0) return nullptr;
  PyObject* m = PyModule_Create(&module_def);
  if (m == nullptr) return nullptr;
  Py_INCREF(&MonitorType);
  if (PyModule_AddObject(m, "Monitor", reinterpret_cast<PyObject*>(&MonitorType)) < 0) {
    Py_DECREF(&MonitorType);
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
