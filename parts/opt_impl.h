/* opt impl: filled in by its owner */
