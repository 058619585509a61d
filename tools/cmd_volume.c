int msx_cmd_segment_volume(int argc, char **argv) { (void)argc; (void)argv; return 2; }
