"""One router module per endpoint family; each is thin over the data plane (`service.dataplane`)."""
