"""sevemu.firmware"""
