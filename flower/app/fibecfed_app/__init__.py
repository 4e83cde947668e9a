"""FibecFed on Flower's deployment runtime: a ServerApp and a ClientApp around the
`fibecfed` bindings (the Rust client and server steps)."""
