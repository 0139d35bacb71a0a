"""The kernel count of benchmarks/compiled_kernels.py on a hand-written optimised HLO module."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

from compiled_kernels import kernel_summary  # noqa: E402

HLO = """HloModule jit_step, entry_computation_layout={(f32[8,4]{1,0})->f32[8,4]{1,0}}

%fused_add (p0: f32[8,4]) -> f32[8,4] {
  %p0 = f32[8,4]{1,0} parameter(0)
  ROOT %add = f32[8,4]{1,0} add(%p0, %p0)
}

%body (state: (s32[], f32[8,4])) -> (s32[], f32[8,4]) {
  %state = (s32[], f32[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %x = f32[8,4]{1,0} get-tuple-element(%state), index=1
  %loop_add_fusion = f32[8,4]{1,0} fusion(%x), kind=kLoop, calls=%fused_add
  %next = s32[] add(%i, %i)
  ROOT %tuple = (s32[], f32[8,4]{1,0}) tuple(%next, %loop_add_fusion)
}

%condition (state: (s32[], f32[8,4])) -> pred[] {
  %state = (s32[], f32[8,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%state), index=0
  %c = s32[] constant(10)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (x: f32[8,4]) -> f32[8,4] {
  %x = f32[8,4]{1,0} parameter(0)
  %big = f32[1024,1024]{1,0} copy(f32[1024,1024]{0,1} %y)
  %conv = (bf16[8,4]{1,0}, u8[0]{0}) custom-call(%x), custom_call_target="__cudnn$convForward"
  %input_reduce_fusion = f32[8]{0} fusion(%x), kind=kInput, calls=%fused_add
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,4]{1,0}) tuple(%zero, %x)
  %while = (s32[], f32[8,4]{1,0}) while(%init), condition=%condition, body=%body
  ROOT %out = f32[8,4]{1,0} get-tuple-element(%while), index=1
}
"""


def test_kernel_summary_counts_launches_in_the_entry_and_loop_bodies():
    summary = kernel_summary(HLO)
    # entry: copy, custom-call, one fusion; loop body: one fusion and one add; condition: compare
    assert summary["kinds"] == {"fusion kLoop": 1, "fusion kInput": 1, "copy": 1,
                                "__cudnn$convForward": 1, "add": 1, "compare": 1}
    assert summary["kernels"] == 6
    assert summary["loops"] == 1 and summary["kernels_in_loops"] == 3  # fusion, add, compare
    assert summary["copies"] == 1 and summary["copy_mb"] == 4.0  # f32[1024,1024]
    assert summary["small_kernels"] == 5
    # Bytes read and written, each operand once: the copy 2 x 4 MiB (its operand's type is
    # inline), the convolution 128 + 64, the reduction 128 + 32, and in the loop the fusion
    # 128 + 128, the add 4 + 4 (one operand, twice) and the compare 4 + 4 + 1.
    assert summary["gb_moved"] * 1e9 == pytest.approx(8 * 2 ** 20 + 192 + 160 + 256 + 8 + 9)
    # All but the convolution move memory rather than compute.
    assert (summary["gb_moved"] - summary["gb_moved_by_memory_kernels"]) * 1e9 == \
        pytest.approx(192)


def test_targets_tell_jax_their_compute_capability(monkeypatch):
    """Without the card, JAX would judge cuDNN attention for a GPU before Hopper (head sizes up
    to 128); compiling for an H100/H200 target makes it judge for compute capability 9.0."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    import compiled_kernels

    monkeypatch.setattr(cudnn_attention, "check_compute_capability",
                        cudnn_attention.check_compute_capability)  # restored afterwards
    import jax

    if jax.default_backend() == "cpu":  # no GPU here: JAX's own check says "before Hopper"
        assert not cudnn_attention.check_compute_capability("9.0")
    compiled_kernels._assume_compute_capability("h200")
    assert cudnn_attention.check_compute_capability("9.0")
    assert cudnn_attention.check_compute_capability("8.0")
    assert not cudnn_attention.check_compute_capability("10.0")
