"""Training scripts of the embedded toy model; run them as ``python -m training.<script>`` from the repo root."""
