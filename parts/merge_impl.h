/* merge impl: filled in by its owner */
