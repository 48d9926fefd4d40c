"""Regional `torch.compile` of the encoder and decoder layers that stays compiled through a whole run.

Training shows each layer many input shapes (bucketed batches of every length, the encoder's dense mask once a clip
reaches its sliding window), two grad modes (training, evaluation) and decoding with a KV cache. With static shapes
dynamo compiles a new graph for each and, past `torch._dynamo.config.recompile_limit` (8) graphs for one frame, runs
the layer eagerly for good: in a bucketed run that happened within epoch 0 and 30-35 % of layer calls then ran
eager. `dynamic=True` traces sizes symbolically, so one graph serves every length; the budget
(`RECOMPILE_BUDGET`) covers the remaining variants (grad mode, mask or no mask, cache or none) with room to spare.

`compile_layers` returns a `CompileStats` that counts graphs compiled and layer calls that ran no compiled graph
(eager fallbacks), so the run can log them and a test can prove a run stays 100 % compiled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# Graphs per layer frame. With dynamic=True the bucketed 3-epoch run with eval and decoding of tests/test_compile.py
# compiles 19 graphs for both stacks together (sizes 0/1 specialise, grad modes, cache or none): ~10 per frame.
RECOMPILE_BUDGET = 64


@dataclass
class CompileStats:
    """Counters of the compiled layers: `graphs` compiled (first compilations and recompilations), `layer_calls`,
    and `eager_calls`, the layer calls in which no compiled graph ran (dynamo gave up on the frame)."""

    layers: int = 0
    graphs: int = 0
    layer_calls: int = 0
    eager_calls: int = 0
    _graph_ran: bool = field(default=False, repr=False)  # set by a compiled graph while a layer call runs

    @property
    def compiled_fraction(self) -> float:
        return 1.0 - self.eager_calls / max(self.layer_calls, 1)

    def metrics(self) -> dict[str, float]:
        return {"compiled_graphs": self.graphs, "eager_layer_calls": self.eager_calls,
                "compiled_fraction": self.compiled_fraction}


def counting_backend(backend: str | Callable, stats: CompileStats) -> Callable:
    """`backend` (a registered name such as "inductor" or "eager", or a callable) that counts each graph it compiles
    and marks every run of a compiled graph in `stats`."""
    from torch._dynamo.backends.registry import lookup_backend

    compile_graph = lookup_backend(backend) if isinstance(backend, str) else backend

    def compile_counted(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        stats.graphs += 1
        compiled = compile_graph(graph, example_inputs)

        def run(*args: Any) -> Any:
            stats._graph_ran = True
            return compiled(*args)

        return run

    return compile_counted


def compile_layers(model: torch.nn.Module, *, backend: str | Callable = "inductor", dynamic: bool = True,
                   recompile_limit: int = RECOMPILE_BUDGET) -> CompileStats:
    """Compile every encoder and decoder layer's forward (through PEFT wrappers: layers are found by type).

    The layers of a stack share one code object, so one compilation serves all of them (~30 s for the 4B model on
    an H100); the many small elementwise kernels of eager layers (norms, rotary, SwiGLU, LoRA casts) fuse: LoRA MFU
    17 % -> 29 % in benchmarks/RESULTS.md. `recompile_limit` raises dynamo's global limit (never lowers it).
    """
    from transformers.models.voxtral_realtime.modeling_voxtral_realtime import (
        VoxtralRealtimeEncoderLayer,
        VoxtralRealtimeTextDecoderLayer,
    )

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    stats = CompileStats()
    counted = counting_backend(backend, stats)
    for layer in model.modules():
        if isinstance(layer, (VoxtralRealtimeEncoderLayer, VoxtralRealtimeTextDecoderLayer)):
            layer.forward = _counted_call(torch.compile(layer.forward, backend=counted, dynamic=dynamic), stats)
            stats.layers += 1
    return stats


def _counted_call(compiled: Callable, stats: CompileStats) -> Callable:
    """`compiled`, counting its calls and those in which dynamo ran no compiled graph (outside the compiled region:
    a Python counter inside it would be traced)."""

    @functools.wraps(compiled)
    def call(*args: Any, **kwargs: Any) -> Any:
        stats.layer_calls += 1
        stats._graph_ran = False
        out = compiled(*args, **kwargs)
        stats.eager_calls += not stats._graph_ran
        return out

    return call
