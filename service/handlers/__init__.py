"""One router module per endpoint family; each is thin over `service.runtime.Runtime`."""
