"""sevemu.certs"""
