/* opt api: filled in by its owner */
