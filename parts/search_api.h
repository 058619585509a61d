/* search api: filled in by its owner */
