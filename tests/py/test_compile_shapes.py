"""--compile compiles the model once for a whole run, although every batch's token count is its own longest
caption's: the trainer marks the sizes that vary dynamic. Counted with a compiler backend that records each
graph dynamo hands it (and runs it as is), in place of inductor's minute-long compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from mgpu import step, train_clip

from test_train_clip import TINY


@pytest.fixture
def counted_compile(monkeypatch):
    """torch.compile as the trainer calls it, with a backend that counts the graphs it is given."""
    graphs: list[list[tuple[int, ...]]] = []
    real_compile = torch.compile

    def backend(gm, example_inputs):
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=backend))
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


@pytest.fixture
def token_lengths(monkeypatch):
    """Each step's token count, read as the trainer hands the batch to the model."""
    seen: list[int] = []
    real_inputs = step.inputs

    def spy(batch, *args, **kwargs):
        seen.append(batch["tokens"].shape[1])
        return real_inputs(batch, *args, **kwargs)

    monkeypatch.setattr(step, "inputs", spy)
    return seen


def test_compile_traces_the_model_once_for_every_caption_length(tmp_path, counted_compile, token_lengths):
    assert train_clip.main([*TINY, "--compile", "--max-steps", "4",
                            "--output-dir", str(tmp_path)]) == 0
    assert len(set(token_lengths)) >= 3, token_lengths  # the synthetic captions' lengths do vary
    assert len(counted_compile) == 1, f"{len(counted_compile)} graphs for token counts {token_lengths}"


def test_without_the_marks_a_second_length_compiles_again(tmp_path, counted_compile, token_lengths, monkeypatch):
    """The counter can fail: the same run with the marks switched off compiles twice."""
    real_inputs = step.inputs  # the spy, which calls the real one
    monkeypatch.setattr(step, "inputs", lambda batch, device, region, compiled=False: real_inputs(batch, device, region))
    assert train_clip.main([*TINY, "--compile", "--max-steps", "4",
                            "--output-dir", str(tmp_path)]) == 0
    assert len(set(token_lengths)) >= 2
    assert len(counted_compile) == 2, f"{len(counted_compile)} graphs for token counts {token_lengths}"
