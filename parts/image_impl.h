/* image impl: filled in by its owner */
