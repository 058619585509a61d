/* sam api: filled in by its owner */
