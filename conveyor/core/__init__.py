"""The pure core: requests, blocks, the scheduler and its KV policy. No torch, no asyncio, no tools."""
