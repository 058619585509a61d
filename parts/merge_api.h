/* merge api: filled in by its owner */
