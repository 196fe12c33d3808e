"""Infrastructure of the perf suite: launching jobs (launch), emulated links (netem),
py-spy profiles (profile), shared units and the driver/worker pattern (workers)."""
