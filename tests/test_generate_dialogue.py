"""`python -m flamingo_jax.generate`'s dialogue loop: replies stay in the conversation, `:reset`
starts over, a bad line is reported without ending the session, `:quit` leaves, and each turn
samples with its own seed. The engine is a stand-in that records what it is asked."""

from __future__ import annotations

from pathlib import Path

import pytest
from absl import flags
from absl.testing import flagsaver

from flamingo_jax import generate, runtime
from flamingo_jax.inference import engine as engine_module
from flamingo_jax.inference.items import END_OF_CHUNK, Media
from flamingo_jax.inference.prompting import parse_prompt


class RecordingEngine:
    def __init__(self):
        self.calls: list = []

    def generate(self, prompts, options, batch_size=None):
        self.calls.append((prompts, options))
        return [f"reply {len(self.calls)}"]


@pytest.fixture
def dialogue(monkeypatch, capsys, tmp_path):
    """Runs the CLI's main on `lines` of input; returns (engine, printed lines, lines read)."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(runtime, "enable_compilation_cache", lambda: None)
    monkeypatch.setattr(runtime, "quiet_library_logs", lambda: None)

    def run(lines, **flag_values):
        engine = RecordingEngine()
        monkeypatch.setattr(engine_module.Engine, "from_workdir", classmethod(lambda cls, *a, **k: engine))
        pending = list(lines)

        def read(prompt):
            if not pending:
                raise EOFError
            return pending.pop(0)

        monkeypatch.setattr("builtins.input", read)
        with flagsaver.flagsaver(workdir=str(tmp_path), **flag_values):
            generate.main([])
        printed = capsys.readouterr().out.splitlines()
        return engine, printed, len(lines) - len(pending)

    return run


def test_dialogue_keeps_history_resets_reports_errors_and_quits(dialogue, tmp_path):
    lines = ["<image:cat.png> Output:", "And then?", "<video:missing> What?", ":reset", "Hello", ":quit", "unread"]
    engine, printed, read = dialogue(lines, method="sample", seed=5, max_new_tokens=4)
    assert read == 6  # nothing after :quit
    first, second, third = (prompts[0] for prompts, _ in engine.calls)
    assert first == parse_prompt(lines[0], tmp_path)
    assert isinstance(first[0], Media) and first[0].path == tmp_path / "cat.png"
    # The reply, closed by <EOC>, stays in the conversation the next turn sees.
    assert second == first + [" reply 1", END_OF_CHUNK] + ["And then?"]
    # The bad line was reported and left the history alone; :reset emptied it.
    assert third == ["Hello"]
    assert printed[1:] == ["reply 1", "reply 2",
                           f"error: video frame folder {tmp_path / 'missing'} does not exist.", "reply 3"]
    assert [options.seed for _, options in engine.calls] == [5, 6, 7]  # a seed per answered turn
    assert all(options.method == "sample" and options.max_new_tokens == 4 for _, options in engine.calls)


def test_end_of_input_ends_the_dialogue_and_one_prompt_mode_answers_once(dialogue, tmp_path):
    engine, printed, read = dialogue(["Hi"])  # then end of input
    assert read == 1 and len(engine.calls) == 1 and printed[-1] == "reply 1"
    engine, printed, read = dialogue(["never read"], prompt="<image:a.png> Output:", method="greedy")
    assert read == 0 and printed == ["reply 1"]
    ((prompt,), options), = engine.calls
    assert prompt == parse_prompt("<image:a.png> Output:", Path(tmp_path)) and options.method == "greedy"
