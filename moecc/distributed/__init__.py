"""Expert parallelism on torch.distributed: dispatch / all-to-all / combine, the cost model, the overlap
schedule and the test transport."""
