"""The command line: `entry` (parse, then run the chosen command), `args` (argument types, the engine flags
generated from `options`), `parser` (one `add_<command>` each) and the commands by group."""
