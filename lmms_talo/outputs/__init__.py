"""What a run leaves behind: the report and its reader, the probe log, the probe store, the
annotations of the harness's own outputs, progress lines and export."""
