/* image api: filled in by its owner */
