"""Shared helpers of the moelens Streamlit workbench (store access, run picking, downloads).

Pages import this package after putting ``app/`` on ``sys.path`` (see the first lines of each page), so the
same page works under ``streamlit run app/Home.py`` and under ``streamlit.testing.v1.AppTest``.
"""
