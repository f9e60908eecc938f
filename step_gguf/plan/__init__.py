"""The planner: where each tensor of a Step 3.5 model lives on a machine, and how fast it will
run. Pure arithmetic over `ModelFacts` and a machine profile: it opens no file and loads no
native code (`facts` reads the facts, the runtime carries the plan out)."""

from .expert_cache import CacheRequest, Locality
from .machines import CUSTOM, GB, GPU_MARGIN, PROFILES, RAM_MARGIN, GiB, Profile, RpcHost, machine, sized_for, this_machine, usable
from .memory import KV_TYPES, checkpoint_bytes, compute_buffer, input_buffer, kv_bytes, kv_positions, kv_read
from .placement import MAX_SLOTS, SLOT_CTX, longest, plan, serving
from .result import Device, ExpertCache, Plan
from .speed import CPU_EFFICIENCY, CPU_LAYER_S

__all__ = ["CPU_EFFICIENCY", "CPU_LAYER_S", "CUSTOM", "GB", "GPU_MARGIN", "KV_TYPES", "PROFILES",
           "RAM_MARGIN", "CacheRequest", "Device", "ExpertCache", "GiB", "Locality", "Plan", "Profile", "RpcHost", "checkpoint_bytes",
           "compute_buffer", "input_buffer", "kv_bytes", "kv_positions", "kv_read", "longest", "machine", "MAX_SLOTS", "plan", "serving",
           "SLOT_CTX", "sized_for", "this_machine", "usable"]
