/* ckpt impl: filled in by its owner */
