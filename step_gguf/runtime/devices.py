"""ggml's device registry in this process, through ctypes: the buffer types and GPUs models
load onto, and RPC hosts registered as devices."""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import RuntimeMissingError, StepGGUFError
from ..native.installed import BUILD_HINT, check


_GGML_API = (("ggml_backend_dev_count", ctypes.c_size_t, []),
             ("ggml_backend_dev_get", ctypes.c_void_p, [ctypes.c_size_t]),
             ("ggml_backend_dev_buffer_type", ctypes.c_void_p, [ctypes.c_void_p]),
             ("ggml_backend_dev_type", ctypes.c_int, [ctypes.c_void_p]),
             ("ggml_backend_dev_backend_reg", ctypes.c_void_p, [ctypes.c_void_p]),
             ("ggml_backend_reg_name", ctypes.c_char_p, [ctypes.c_void_p]),
             ("ggml_backend_reg_by_name", ctypes.c_void_p, [ctypes.c_char_p]),
             ("ggml_backend_reg_get_proc_address", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
             ("ggml_backend_reg_dev_get", ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t]),
             ("ggml_backend_register", None, [ctypes.c_void_p]),
             ("ggml_backend_buft_name", ctypes.c_char_p, [ctypes.c_void_p]),
             ("ggml_backend_dev_name", ctypes.c_char_p, [ctypes.c_void_p]),
             ("ggml_backend_dev_description", ctypes.c_char_p, [ctypes.c_void_p]),
             ("ggml_backend_dev_memory", None, [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                ctypes.POINTER(ctypes.c_size_t)]))


_DEVICE_GPU, _DEVICE_IGPU = 1, 2  # enum ggml_backend_dev_type


@functools.cache
def libggml() -> ctypes.CDLL:
    """The ggml that libllama itself links: its device registry is the one models load from
    (llama-cpp-python's own `_ggml` module opens a second copy with a registry of its own)."""
    check()
    import llama_cpp  # noqa: PLC0415

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    found = sorted(lib_dir.glob("libggml.so.*"), key=lambda f: len(f.name)) or sorted(lib_dir.glob("libggml.*"))
    if not found:
        raise RuntimeMissingError(f"libggml is missing from {lib_dir}; {BUILD_HINT}")
    lib = ctypes.CDLL(str(found[0]))
    for fn, res, args in _GGML_API:
        getattr(lib, fn).restype, getattr(lib, fn).argtypes = res, args
    from llama_cpp import _logger  # noqa: PLC0415

    _logger.set_verbose(False)  # not a line per backend module loaded (native/cpu.py)
    llama_cpp.llama_backend_init()
    return lib


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def cpu_backend_file() -> Path:
    """The file ggml loaded its CPU backend from: with the x86 variants, libggml-cpu-TAG.so of
    the best level this CPU runs, or the one GGML_CPU_VARIANT pins."""
    lib = libggml()
    reg = lib.ggml_backend_reg_by_name(b"CPU")
    fn = reg and lib.ggml_backend_reg_get_proc_address(reg, b"ggml_backend_set_n_threads")
    info = _DlInfo()
    if not fn or not ctypes.CDLL(None).dladdr(ctypes.c_void_p(fn), ctypes.byref(info)):
        raise RuntimeMissingError(f"ggml loaded no CPU backend; {BUILD_HINT}")
    return Path(info.dli_fname.decode())


def buffer_type(name: str) -> int:
    """The ggml buffer type called `name` ("CPU", "CUDA0", ...) on this build's devices."""
    lib = libggml()
    names = []
    for i in range(lib.ggml_backend_dev_count()):
        buft = lib.ggml_backend_dev_buffer_type(lib.ggml_backend_dev_get(i))
        names.append(lib.ggml_backend_buft_name(buft).decode())
        if names[-1] == name:
            return buft
    raise StepGGUFError(f"this runtime has no {name} buffer type (it has {', '.join(names)})")


def local_gpus() -> list[int]:
    """This machine's GPU devices, as llama.cpp picks them by default (integrated ones only
    without a discrete one); RPC hosts are not among them."""
    lib = libggml()
    found: dict[int, list[int]] = {_DEVICE_GPU: [], _DEVICE_IGPU: []}
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        kind = lib.ggml_backend_dev_type(dev)
        reg = lib.ggml_backend_reg_name(lib.ggml_backend_dev_backend_reg(dev)).decode()
        if kind in found and not reg.startswith("RPC"):
            found[kind].append(dev)
    return found[_DEVICE_GPU] or found[_DEVICE_IGPU]


def rpc_device(endpoint: str) -> int:
    """Register the ggml RPC server at `endpoint` in this process; its device. The server must
    have answered already (step_gguf.runtime.rpc probes it): a failed handshake aborts."""
    lib = libggml()
    rpc = lib.ggml_backend_reg_by_name(b"RPC")
    add = rpc and lib.ggml_backend_reg_get_proc_address(rpc, b"ggml_backend_rpc_add_server")
    if not add:
        raise RuntimeMissingError(f"this runtime was built without ggml RPC; {BUILD_HINT}")
    reg = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_char_p)(add)(endpoint.encode())
    lib.ggml_backend_register(reg)
    return lib.ggml_backend_reg_dev_get(reg, 0)


@dataclass(frozen=True)
class Gpu:
    """A GPU llama.cpp would offload to, as its backend reports it."""

    name: str          # llama.cpp's device name: Vulkan0, CUDA0, ...
    description: str   # the card: "NVIDIA GeForce RTX 4090", "llvmpipe (LLVM 15.0.6, 256 bits)"
    free: int          # bytes
    total: int
    integrated: bool   # shares system memory (DGX Spark, Strix Halo, Apple)


def gpus() -> list[Gpu]:
    """local_gpus() with their memory. A Vulkan build lists none where no Vulkan driver is
    installed, and skips a software device (Mesa's llvmpipe) unless GGML_VK_VISIBLE_DEVICES
    names it."""
    lib = libggml()
    out = []
    for dev in local_gpus():
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(Gpu(lib.ggml_backend_dev_name(dev).decode(), lib.ggml_backend_dev_description(dev).decode(),
                       free.value, total.value, lib.ggml_backend_dev_type(dev) == _DEVICE_IGPU))
    return out
