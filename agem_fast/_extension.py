"""Placeholder until the extension lands."""
def supports(device_type): return False
def status(): return {"status": "not built", "error": None}
