"""sevemu.crypto"""
