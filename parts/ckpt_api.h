/* ckpt api: filled in by its owner */
