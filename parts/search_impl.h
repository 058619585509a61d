/* search impl: filled in by its owner */
