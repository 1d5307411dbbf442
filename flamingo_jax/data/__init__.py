"""Data side of flamingo_jax: records on disk -> batches for the train step.

Modules, each one idea:
  tokenizer    SentencePiece (or a Hugging Face tokenizer.json) + `<EOC>` (id vocab_size) + the `<image>`
               marker; `load_tokenizer` picks by file; `train` CLI
  formats      TFRecord schemas (interleaved docs, image-text, video-text) and their writers
  records      the TFRecord reader: checksum errors, cut-off and unreadable files become counted skips
  images       one decoder (training and inference), fit, mean-pad, normalise, augment
  frames       video frame folders listed in time order (f2 before f10), for every reader
  sequence     token roles, `<EOC>` placement, windows, media_index, loss_mask (numpy)
  pipeline     host sharding, deterministic order, resumable state, counted skipping
  interleaved  M3W-style documents -> batches
  pairs        image-text and video-text pairs -> batches
  mixture      one pipeline per dataset, stepped together: {name: batch} per step
  tfds_source  a prepared TFDS split as a pipeline's records (mixture entries of kind 'tfds')
  prepare      importers from MMC4/OBELICS, webdataset tars, video frame folders
  synthetic    a procedural corpus + held-out eval tasks, so nothing needs downloading

Importing this package imports none of its modules (so `python -m
flamingo_jax.data.<tool>` runs its module once) and not TensorFlow; the
pipelines import it on first use, hidden from every accelerator. Nothing here
imports the model, training or evaluation code.

Batch contract (one dataset; B batch, L tokens, N media slots, T frames, S pixels):
  tokens int32 [B, L], targets int32 [B, L], loss_mask float32 [B, L],
  media float32 [B, N, T, S, S, 3], media_index int32 [B, L].
A slot no token points at (media_index) is unused and holds zeros; the model never reads it,
so no separate media mask is carried.
"""
