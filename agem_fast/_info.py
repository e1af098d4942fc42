def backend_info(): return {}
