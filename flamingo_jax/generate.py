"""Interactive multi-image dialogue with a trained Flamingo.

    python -m flamingo_jax.generate --workdir=workdirs/tiny
    > <image:cat.jpg> Output:
    a cat sitting on a mat
    > <image:dog.jpg> Output:
    ...
    python -m flamingo_jax.generate --workdir=workdirs/tiny --prompt="<image:cat.jpg> Output:"

A line may hold text, images (`<image:path>`), videos as frame folders
(`<video:dir>`) and `<EOC>`. Each line extends the conversation, and the
model's reply (closed by `<EOC>`) stays in it, so later turns see earlier
images and answers. `:reset` starts over, `:quit` (or end of input) leaves.
"""

from pathlib import Path

from absl import flags

from flamingo_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir (holds checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "SentencePiece model (default: the run's).")
_PROMPT = flags.DEFINE_string("prompt", None, "Answer this one prompt and exit (default: interactive).")
_METHOD = flags.DEFINE_enum("method", "beam", ["beam", "greedy", "sample"], "Decoding method.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 20, "Most tokens per reply.")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", 3, "Beam size (method=beam).")
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 0.0, "GNMT length-penalty alpha (method=beam).")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Sampling temperature (method=sample).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k likeliest tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
    del argv
    from flamingo_jax import runtime
    from flamingo_jax.errors import UserError
    from flamingo_jax.inference.engine import DecodeOptions, Engine
    from flamingo_jax.inference.items import END_OF_CHUNK
    from flamingo_jax.inference.prompting import parse_prompt

    options = DecodeOptions(method=_METHOD.value, max_new_tokens=_MAX_NEW_TOKENS.value, num_beams=_NUM_BEAMS.value,
                            length_penalty=_LENGTH_PENALTY.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                            top_p=_TOP_P.value, seed=_SEED.value)  # a bad setting fails before the model loads
    runtime.quiet_library_logs()
    runtime.enable_compilation_cache()
    engine = Engine.from_workdir(_WORKDIR.value, step=_STEP.value, tokenizer_path=_TOKENIZER.value)
    if _PROMPT.value is not None:
        print(engine.generate([parse_prompt(_PROMPT.value, Path.cwd())], options)[0])
        return
    history: list = []
    turn = 0
    print("Flamingo dialogue: <image:path>, <video:frame_dir> and text per line; :reset, :quit.")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() == ":quit":
            break
        if line.strip() == ":reset":
            history = []
            continue
        try:
            items = history + parse_prompt(line, Path.cwd())
            reply = engine.generate([items], DecodeOptions(**{**options.__dict__, "seed": options.seed + turn}))[0]
        except UserError as error:  # a bad path, tag or image, a too-long conversation: say so, keep the session
            print(f"error: {error}")
            continue
        print(reply)
        history = items + [" " + reply, END_OF_CHUNK]
        turn += 1


if __name__ == "__main__":
    flags.mark_flag_as_required("workdir")
    cli.run(main)
