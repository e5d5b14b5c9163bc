from tunesmith.cli import main

if __name__ == "__main__":  # a spawned child process (data/prepare.py) imports this module too
    main()
