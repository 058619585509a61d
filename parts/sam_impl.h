/* sam impl: filled in by its owner */
